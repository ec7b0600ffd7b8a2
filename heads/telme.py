"""TelME (Yun et al., 2024, telme.md §3.2) on cached features: a text teacher distils into audio and visual
students, then Attention-based modality Shifting Fusion (ASF) shifts the teacher's representation.

- Teacher: the text store's features F_T and logits Z^t. A fine-tuned teacher store carries `logits`;
  for any other text store a linear teacher head is fitted on the train split first (`fit_teacher`) and
  kept frozen, so the teacher's predictions are fixed during distillation, as in the paper.
- Students (audio, visual): an MLP from the cached feature to the teacher's dimension plus a classifier,
  trained with L_student = L_cls + alpha L_response + beta L_feature (eq. 6): `dist_loss` (eq. 7-12) and
  `feature_kd_loss` (eq. 13-15).
- ASF (eq. 16-19): multi-head self-attention over the student vectors, gate g = R(W1 <F_T, F_att> + b1),
  displacement H = g * (W2 F_att + b2), Z = F_T + lambda H with lambda = min(||F_T|| / ||H|| * theta, 1).
  The fusion sees the students' vectors detached: the students learn only from L_student (the paper's
  distillation stage) and the fusion only from its own CE (its fusion stage), in one training run.
- Table 3 ablations: `response: false`, `feature: false`, `fusion: concat` (CE-trained students, concatenated).
- `students: mlp` (default, the cheap reading) trains the MLP students above over frozen audio/visual stores.
  `students: stores` is the paper's two-stage reading: the audio/visual stores already are the students'
  representations (encoders fine-tuned with the `telme_student` objective, pipeline/distil.py, projected to the
  teacher's size), so ASF fuses them as they are and the head trains with the fusion's CE alone (§3.2.4).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from heads import ERCHead, register
from heads.data import IGNORE, DialogueBatch

# Table 9 (where the appendix prose disagrees with the table — temperature and dropout — the table is used)
PAPER_DEFAULTS = {
    "meld": {"alpha": 1.0, "beta": 1.0, "tau_response": 2.0, "tau_feature": 1.0, "theta": 0.1, "dropout": 0.1,
             "heads": 3},
    "iemocap": {"alpha": 0.1, "beta": 1.0, "tau_response": 4.0, "tau_feature": 1.0, "theta": 0.01, "dropout": 0.2,
                "heads": 4},
}


def pearson_distance(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 7: d(u, v) = 1 - rho(u, v), row-wise Pearson correlation of [n, k] tensors."""
    u = u - u.mean(-1, keepdim=True)
    v = v - v.mean(-1, keepdim=True)
    return 1 - (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 8-12: L_response = L_inter + L_intra on temperature-softened probabilities [B, C].

    L_inter = tau^2 / B * sum_i d(Y^s_i,:, Y^t_i,:); L_intra = tau^2 / C * sum_j d(Y^s_:,j, Y^t_:,j)."""
    ys = F.softmax(student_logits / tau, dim=-1)
    yt = F.softmax(teacher_logits / tau, dim=-1)
    inter = tau ** 2 * pearson_distance(ys, yt).mean()
    intra = tau ** 2 * pearson_distance(ys.t(), yt.t()).mean()
    return inter + intra


def feature_kd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 13-15: KL(P_i || Q_i) averaged over the batch, with P = softmax(M / tau), M the teacher-teacher
    similarity and Q = softmax(M' / tau), M' the student-teacher similarity of L2-normalised vectors [B, d]."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    log_p = F.log_softmax(t @ t.t() / tau, dim=-1)
    log_q = F.log_softmax(s @ t.t() / tau, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


class Student(nn.Module):
    """A non-verbal student on a cached feature: F_s = MLP(x) in the teacher's dimension, Z^s = W F_s."""

    def __init__(self, d_in: int, d_teacher: int, n_out: int, dropout: float, d_hidden: int | None = None):
        super().__init__()
        d_hidden = d_hidden or d_teacher
        self.encoder = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(d_hidden, d_teacher))
        self.classifier = nn.Linear(d_teacher, n_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(x)
        return f, self.classifier(f)


class ASF(nn.Module):
    """Eq. 16-19: attention over the student vectors, gating, displacement and the lambda-scaled shift."""

    def __init__(self, d: int, n_students: int, heads: int, theta: float, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.w1 = nn.Linear(d + n_students * d, d)      # eq. 16
        self.w2 = nn.Linear(n_students * d, d)          # eq. 17
        self.theta = theta
        self.dropout = nn.Dropout(dropout)

    def forward(self, f_t: torch.Tensor, students: list[torch.Tensor]) -> torch.Tensor:
        s = torch.stack(students, dim=-2)                               # [..., n, d]
        flat = s.reshape(-1, *s.shape[-2:])
        att, _ = self.attention(flat, flat, flat)
        f_att = att.reshape(*s.shape[:-2], -1)                          # <F_a', F_v'>
        g = F.relu(self.w1(torch.cat([f_t, f_att], dim=-1)))            # eq. 16, R = ReLU
        h = g * self.w2(f_att)                                          # eq. 17
        lam = (f_t.norm(dim=-1, keepdim=True) / (h.norm(dim=-1, keepdim=True) + 1e-6) * self.theta).clamp(max=1)
        return self.dropout(f_t + lam * h)                              # eq. 18-19


@register("telme")
class TelME(ERCHead):
    PAPER_DEFAULTS = PAPER_DEFAULTS   # options `paper_defaults: meld | iemocap` (explicit options still win)

    def __init__(self, dims, n_out, task, teacher: str = "text", alpha: float = 1.0, beta: float = 1.0,
                 tau_response: float = 2.0, tau_feature: float = 1.0, theta: float = 0.1, dropout: float = 0.1,
                 heads: int = 3, response: bool = True, feature: bool = True,
                 fusion: Literal["asf", "concat"] = "asf", student_hidden: int | None = None,
                 students: Literal["mlp", "stores"] = "mlp"):
        super().__init__(dims, n_out, task)
        if teacher not in dims:
            raise ValueError(f"TelME needs the teacher modality '{teacher}' among {list(dims)}")
        if fusion not in ("asf", "concat"):
            raise ValueError("TelME fusion: asf | concat")
        if students not in ("mlp", "stores"):
            raise ValueError(f"TelME students: mlp | stores, not {students!r}")
        self.teacher_name = teacher
        self.student_names = [m for m in dims if m != teacher]
        d_t = self.dims[teacher]
        self.alpha, self.beta, self.tau_r, self.tau_f = alpha, beta, tau_response, tau_feature
        self.use_response, self.use_feature, self.fusion = response, feature, fusion
        # frozen teacher head: used when the text store has no logits; set by fit_teacher
        self.teacher_head = nn.Linear(d_t, n_out)
        self.teacher_head.requires_grad_(False)
        self.student_mode = students
        if students == "stores":
            wrong = {m: self.dims[m] for m in self.student_names if self.dims[m] != d_t}
            if wrong:
                raise ValueError(f"TelME students: stores fuses the student stores as they are, so each must have "
                                 f"the teacher's dimension {d_t}; got {wrong} (a telme_student fine-tune projects "
                                 "to it; or use students: mlp)")
        self.students = nn.ModuleDict({m: Student(self.dims[m], d_t, n_out, dropout, student_hidden)
                                       for m in self.student_names} if students == "mlp" else {})
        if self.student_names and fusion == "asf":
            while d_t % heads:
                heads -= 1   # MultiheadAttention needs d % heads == 0
            self.asf = ASF(d_t, len(self.student_names), heads, theta, dropout)
            self.classifier = nn.Linear(d_t, n_out)
        else:
            self.classifier = nn.Linear(d_t * (1 + len(self.student_names)), n_out)

    def prepare(self, data) -> None:
        self.fit_teacher(data)

    def fit_teacher(self, data, epochs: int = 200, lr: float = 1e-2) -> None:
        """Fit the frozen linear teacher on the train split (when the text store has no logits); a layered
        text store is seen through the head's layer mix as it is now (before training: the layers' mean)."""
        key = f"{self.teacher_name}_logits"
        if key in data.extra or self.task != "categorical":
            return
        rows = data.manifest.rows.index[data.manifest.rows["split"] == "train"].to_numpy()
        x = torch.from_numpy(data.features[self.teacher_name][rows])
        if self.teacher_name in self.mixers:
            with torch.no_grad():
                x = self.mixers[self.teacher_name](x.to(self.mixers[self.teacher_name].logits.device)).cpu()
        y = torch.from_numpy(data.label_ids[rows])
        keep = (y >= 0) & torch.from_numpy(data.valid[self.teacher_name][rows])
        head = nn.Linear(x.shape[1], self.n_out)
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(epochs):
            loss = F.cross_entropy(head(x[keep]), y[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.teacher_head.load_state_dict(head.state_dict())

    def teacher_logits(self, batch: DialogueBatch) -> torch.Tensor:
        key = f"{self.teacher_name}_logits"
        if key in batch.extra:
            return batch.extra[key][batch.mask]
        return self.teacher_head(batch.features[self.teacher_name][batch.mask])

    def encode(self, batch: DialogueBatch):
        """Teacher vectors and student (feature, logits) of the real utterances only ([n, ...]): TelME is
        context-free, so the padding of a dialogue batch is never computed."""
        m = batch.mask
        f_t = batch.features[self.teacher_name][m]
        if self.student_mode == "stores":   # the fine-tuned students' vectors; no logits of theirs are needed
            return f_t, {s: (batch.features[s][m] * batch.valid[s][m][..., None], None) for s in self.student_names}
        students = {s: self.students[s](batch.features[s][m] * batch.valid[s][m][..., None])
                    for s in self.student_names}
        return f_t, students

    def forward(self, batch: DialogueBatch) -> torch.Tensor:
        batch = self.mix(batch)
        f_t, students = self.encode(batch)
        vecs = [students[s][0].detach() for s in self.student_names]
        z = self.classifier(self.asf(f_t, vecs)) if hasattr(self, "asf") else \
            self.classifier(torch.cat([f_t] + vecs, dim=-1))
        return batch.padded(z)

    def loss(self, batch: DialogueBatch, out: torch.Tensor):
        batch = self.mix(batch)   # the students distil from the mixed teacher features
        fusion = self.task_loss(batch, out)
        if self.student_mode == "stores":   # the students were distilled in their own fine-tune (stage 1)
            return fusion, {"fusion": float(fusion.detach())}
        # the students' own pass: `forward` gives the fusion detached copies, so L_student trains them here
        f_t, students = self.encode(batch)
        parts = {"fusion": float(fusion.detach())}
        total = fusion
        labels, dims = batch.labels[batch.mask], batch.dims[batch.mask]
        keep = labels != IGNORE if self.task == "categorical" else torch.ones_like(labels, dtype=torch.bool)
        z_t = self.teacher_logits(batch).detach()
        for m, (f_s, z_s) in students.items():
            ok = keep & batch.valid[m][batch.mask]
            if not ok.any():
                continue
            if self.task == "categorical":
                l_cls = F.cross_entropy(z_s[ok], labels[ok])
            else:
                target_ok = ok[..., None] & torch.isfinite(dims)
                l_cls = F.mse_loss(z_s[target_ok], dims[target_ok])
            student = l_cls
            if self.use_response and self.task == "categorical" and ok.sum() > 1:
                student = student + self.alpha * dist_loss(z_s[ok], z_t[ok], self.tau_r)
            if self.use_feature and ok.sum() > 1:
                student = student + self.beta * feature_kd_loss(f_s[ok], f_t[ok].detach(), self.tau_f)
            parts[f"student_{m}"] = float(student.detach())
            total = total + student
        return total, parts
