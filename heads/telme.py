"""TelME (Yun et al., 2024, arXiv:2401.12987 §3.2) on cached features: a text teacher distils into audio and visual
students, then Attention-based modality Shifting Fusion (ASF) shifts the teacher's representation.

- Teacher: the text store's features F_T and logits Z^t. A fine-tuned teacher store carries `logits`;
  for any other text store a linear teacher head is fitted on the train split first (`fit_teacher`) and
  kept frozen, so the teacher's predictions are fixed during distillation, as in the paper. `teacher_dim`
  projects F_T to that width first (the public code's `Teacher_model.W`, 1024 -> 768, which §4.2 calls "the
  output dimension of all encoders is unified to 768"): the projection is fitted with the teacher's CE on the
  train split and frozen with it. The teacher's features reach the head raw (`normalize`, default: the
  teacher `none`), as in the public code: theta bounds lambda = min(theta ||F_T|| / ||H||, 1) in the
  teacher's own scale.
- Students (audio, visual): an MLP from the cached feature to the teacher's dimension plus a classifier,
  trained with L_student = L_cls + alpha L_response + beta L_feature (eq. 6): `dist_loss` (eq. 7-12) and
  `feature_kd_loss` (eq. 13-15; `kd_rows`: M' = T S^T as the public code, or S T^T).
- ASF (eq. 16-19), `asf: code` (default) as the public module computes it, per utterance: attention over the
  concatenated student vector [F_a ; F_v] with a residual and a LayerNorm, the gate and the shift, and a final
  LayerNorm(F_T + lambda H); `asf: equations` is eq. 16-19 as printed (attention over the student vectors as
  tokens, Z = F_T + lambda H, no norms). The public module gives nn.MultiheadAttention a 2-D [batch, features]
  tensor, which it reads as one unbatched sequence, so each utterance attends over the *other utterances of
  its batch* (its output depends on who shares its batch, at training and at test time): here each utterance
  is a sequence of its own, so over the one concatenated token the attention is its value and output
  projections.
  The fusion sees the students' vectors detached: the students learn only from L_student (the paper's
  distillation stage) and the fusion only from its own CE (its fusion stage), in one training run.
  A masked (missing) student takes no part: its vector is zero in the fusion, whatever its MLP would make of
  a zero input, and an utterance with no student left is not shifted.
- Table 3 ablations: `response: false`, `feature: false`, `fusion: concat` (CE-trained students, concatenated).
- `students: mlp` (default, the cheap reading) trains the MLP students above over frozen audio/visual stores.
  `students: stores` is the paper's two-stage reading: the audio/visual stores already are the students'
  representations (encoders fine-tuned with the `telme_student` objective, heads/telme_students.py, projected to the
  teacher's size), so ASF fuses them as they are (through the frozen teacher projection, when there is one)
  and the head trains with the fusion's CE alone (§3.2.4).
- `paper_defaults`: `meld` / `iemocap` are the settings of the public code that produced the paper's numbers,
  `meld_table` / `iemocap_table` Table 9 as printed (they differ in tau_response, dropout and IEMOCAP's theta);
  `PAPER_SOURCES` names where each value comes from.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from heads import ERCHead, register
from heads.data import IGNORE, DialogueBatch
from pipeline.vocab import Modality, ParamsError, PositiveInt

_CODE = "github.com/yuntaeyang/TelME"
# Table 9's keys in each preset: alpha, beta (L_student, eq. 6), the two temperatures, theta (eq. 19), dropout and
# the attention heads of ASF. Where the appendix prose and the code disagree with the table (tau_response and
# dropout; IEMOCAP's theta), `meld` / `iemocap` follow the code, `*_table` the table.
PAPER_DEFAULTS = {
    "meld": {"alpha": 1.0, "beta": 1.0, "tau_response": 4.0, "tau_feature": 1.0, "theta": 0.1, "dropout": 0.2,
             "heads": 3},
    "iemocap": {"alpha": 0.1, "beta": 1.0, "tau_response": 2.0, "tau_feature": 1.0, "theta": 0.2, "dropout": 0.2,
                "heads": 4},
    "meld_table": {"alpha": 1.0, "beta": 1.0, "tau_response": 2.0, "tau_feature": 1.0, "theta": 0.1, "dropout": 0.1,
                   "heads": 3},
    "iemocap_table": {"alpha": 0.1, "beta": 1.0, "tau_response": 4.0, "tau_feature": 1.0, "theta": 0.01,
                      "dropout": 0.2, "heads": 4},
}
PAPER_SOURCES = {   # preset -> option -> where its value comes from
    "meld": {"alpha": f"{_CODE} MELD/student.py (ori_loss + logit_loss + feature_loss)",
             "beta": f"{_CODE} MELD/student.py (ori_loss + logit_loss + feature_loss)",
             "tau_response": f"{_CODE} MELD/meld_kd.py (Logit_Loss tau=4.0); appendix A.3 prose",
             "tau_feature": f"{_CODE} MELD/meld_kd.py (Feature_Loss temp=1.0)",
             "theta": f"{_CODE} MELD/fusion.py (beta_shift 1e-1)",
             "dropout": f"{_CODE} MELD/fusion.py (dropout_prob 0.2); appendix A.3 prose",
             "heads": f"{_CODE} MELD/fusion.py (num_head 3)"},
    "iemocap": {"alpha": f"{_CODE} IEMOCAP/student.py (0.1 * logit_loss)",
                "beta": f"{_CODE} IEMOCAP/student.py (feature_loss, weight 1)",
                "tau_response": f"{_CODE} IEMOCAP/iemocap_kd.py (Logit_Loss tau=2.0); appendix A.3 prose",
                "tau_feature": f"{_CODE} IEMOCAP/iemocap_kd.py (Feature_Loss temp=1.0)",
                "theta": f"{_CODE} IEMOCAP/fusion.py (beta_shift 2e-1; Table 9 and the prose say 0.01)",
                "dropout": f"{_CODE} IEMOCAP/fusion.py (dropout_prob 0.2)",
                "heads": f"{_CODE} IEMOCAP/fusion.py (num_head 4)"},
    "meld_table": {k: "arXiv:2401.12987 Table 9 (MELD column)" for k in PAPER_DEFAULTS["meld"]},
    "iemocap_table": {k: "arXiv:2401.12987 Table 9 (IEMOCAP column)" for k in PAPER_DEFAULTS["iemocap"]},
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


KDRows = Literal["teacher", "student"]


def feature_kd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float, rows: KDRows = "teacher"
                    ) -> torch.Tensor:
    """Eq. 13-15: KL(P_i || Q_i) averaged over the batch, P = softmax(M / tau) with M = T T^T the teacher-teacher
    similarity and Q = softmax(M' / tau) the student-teacher one, of L2-normalised vectors [B, d].

    The paper does not say which side gives M' its rows: `rows="teacher"` is M' = T S^T (row i: teacher i
    against every student vector), as the public code's Feature_Loss; `rows="student"` is M' = S T^T."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    log_p = F.log_softmax(t @ t.t() / tau, dim=-1)
    m = t @ s.t() if rows == "teacher" else s @ t.t()
    log_q = F.log_softmax(m / tau, dim=-1)
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


ASFStructure = Literal["code", "equations"]


def asf_width(d: int, n_students: int, structure: str) -> int:
    """The width ASF's attention splits over its heads: the concatenated student vector (code) or one
    student vector (equations)."""
    return n_students * d if structure == "code" else d


class ASF(nn.Module):
    """Eq. 16-19: attention over the student vectors, gating, displacement and the lambda-scaled shift.

    `structure="code"`: the public module, per utterance. F_att = Dropout(LN([F_a;F_v] + MHA([F_a;F_v]))) over
    the one concatenated token (n_students * d wide), g = ReLU(W1 <F_T, F_att> + b1), H = g * (W2 F_att + b2),
    Z = Dropout(LN(F_T + lambda H)). `structure="equations"`: F_att = <MHA over the student vectors as
    tokens>, g and H as above, Z = Dropout(F_T + lambda H). lambda = min(||F_T|| / ||H|| * theta, 1) (eq. 19).
    Masked students (`valid` False) are zero in the code's token and no key (their rows zero) in the
    equations' attention; an utterance with no valid student gets H = 0."""

    def __init__(self, d: int, n_students: int, heads: int, theta: float, dropout: float,
                 structure: ASFStructure = "code"):
        super().__init__()
        self.structure, self.theta, self.d = structure, theta, d
        width = asf_width(d, n_students, structure)
        if width % heads:
            raise ValueError(f"ASF: {heads} attention heads do not divide its width {width}")
        # the public code gives its attention no dropout; eq. 16-19 leave it open (the head's dropout here)
        self.attention = nn.MultiheadAttention(width, heads, dropout=0.0 if structure == "code" else dropout,
                                               batch_first=True)
        self.w1 = nn.Linear(d + n_students * d, d)      # eq. 16 (the public code's W_hav)
        self.w2 = nn.Linear(n_students * d, d)          # eq. 17 (W_av)
        if structure == "code":
            self.students_norm = nn.LayerNorm(width)    # AV_LayerNorm
            self.norm = nn.LayerNorm(d)                 # LayerNorm(F_T + lambda H)
        self.dropout = nn.Dropout(dropout)

    def fused_students(self, students: list[torch.Tensor], valid: list[torch.Tensor] | None = None
                       ) -> torch.Tensor:
        """F_att [n, n_students * d] of the student vectors (each [n, d]), per utterance."""
        ok = torch.stack(valid, dim=-1) if valid is not None else \
            torch.ones(*students[0].shape[:-1], len(students), dtype=torch.bool, device=students[0].device)
        s = torch.stack(students, dim=-2) * ok[..., None]                  # [n, k, d], masked students zero
        if self.structure == "code":
            token = s.flatten(-2)[:, None, :]                               # [n, 1, k*d]: one sequence each
            att = self.attention(token, token, token, need_weights=False)[0] + token   # residual
            return self.dropout(self.students_norm(att[:, 0]))
        ignore = ~ok & ok.any(-1, keepdim=True)     # a row with no valid student attends its zeros (no NaN)
        att = self.attention(s, s, s, key_padding_mask=ignore, need_weights=False)[0] * ok[..., None]
        return att.flatten(-2)                                              # <F_a', F_v'>

    def shift(self, f_t: torch.Tensor, f_att: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H [n, d], lambda [n, 1]): eq. 16, 17 and 19."""
        g = F.relu(self.w1(torch.cat([f_t, f_att], dim=-1)))            # eq. 16, R = ReLU
        h = g * self.w2(f_att)                                          # eq. 17
        h_norm = h.norm(dim=-1, keepdim=True)
        h_norm = torch.where(h_norm == 0, torch.ones_like(h_norm), h_norm)   # as the code: no 0/0
        lam = (f_t.norm(dim=-1, keepdim=True) / (h_norm + 1e-6) * self.theta).clamp(max=1)
        return h, lam

    def forward(self, f_t: torch.Tensor, students: list[torch.Tensor],
                valid: list[torch.Tensor] | None = None) -> torch.Tensor:
        h, lam = self.shift(f_t, self.fused_students(students, valid))
        if valid is not None:   # no student, no shift
            h = h * torch.stack(valid, dim=-1).any(-1, keepdim=True)
        z = f_t + lam * h                                               # eq. 18
        return self.dropout(self.norm(z) if self.structure == "code" else z)


@register("telme")
class TelME(ERCHead):
    PAPER_DEFAULTS = PAPER_DEFAULTS   # options `paper_defaults: meld | iemocap | meld_table | iemocap_table`

    def __init__(self, dims, n_out, task, teacher: Modality = "text", alpha: float = 1.0, beta: float = 1.0,
                 tau_response: float = 2.0, tau_feature: float = 1.0, theta: float = 0.1, dropout: float = 0.1,
                 heads: int = 3, response: bool = True, feature: bool = True,
                 fusion: Literal["asf", "concat"] = "asf", student_hidden: int | None = None,
                 students: Literal["mlp", "stores"] = "mlp", teacher_dim: PositiveInt | None = None,
                 asf: ASFStructure = "code", kd_rows: KDRows = "teacher",
                 normalize: dict[Modality, Literal["standard", "none"]] | None = None):
        super().__init__(dims, n_out, task)
        if teacher not in dims:
            raise ValueError(f"TelME needs the teacher modality '{teacher}' among {list(dims)}")
        if fusion not in ("asf", "concat"):
            raise ValueError("TelME fusion: asf | concat")
        if students not in ("mlp", "stores"):
            raise ValueError(f"TelME students: mlp | stores, not {students!r}")
        self.teacher_name = teacher
        self.student_names = [m for m in dims if m != teacher]
        d_store = self.dims[teacher]
        d_t = teacher_dim or d_store     # the width F_T has where the students meet it
        self.alpha, self.beta, self.tau_r, self.tau_f = alpha, beta, tau_response, tau_feature
        self.use_response, self.use_feature, self.fusion, self.kd_rows = response, feature, fusion, kd_rows
        # frozen teacher: an optional projection (teacher_dim) and a linear head used when the text store has no
        # logits; both set by fit_teacher
        self.teacher_proj = nn.Linear(d_store, d_t).requires_grad_(False) if teacher_dim else None
        self.teacher_head = nn.Linear(d_t, n_out)
        self.teacher_head.requires_grad_(False)
        self.student_mode = students
        if students == "stores":
            wrong = {m: self.dims[m] for m in self.student_names if self.dims[m] != d_store}
            if wrong:
                raise ValueError(f"TelME students: stores fuses the student stores as they are, so each must have "
                                 f"the teacher's dimension {d_store}; got {wrong} (a telme_student fine-tune projects "
                                 "to it; or use students: mlp)")
        self.students = nn.ModuleDict({m: Student(self.dims[m], d_t, n_out, dropout, student_hidden)
                                       for m in self.student_names} if students == "mlp" else {})
        if self.student_names and fusion == "asf":
            width = asf_width(d_t, len(self.student_names), asf)
            if width % heads:   # never a silent change of a size: the user picks the fix
                raise ParamsError(
                    f"TelME options: heads ({heads}) does not divide the width ASF's attention splits, {width} ("
                    + (f"{len(self.student_names)} student(s) x " if asf == "code" else "")
                    + f"the teacher's {d_t}); set `teacher_dim` to project the teacher to a width the heads divide "
                      "(the public code's 768), or `heads` to a divisor of it")
            self.asf = ASF(d_t, len(self.student_names), heads, theta, dropout, asf)
            self.classifier = nn.Linear(d_t, n_out)
        else:
            self.classifier = nn.Linear(d_t * (1 + len(self.student_names)), n_out)

    @staticmethod
    def check_options(options: dict) -> None:
        """What `ercflow check` can say without the stores: a `teacher_dim` whose ASF width no student count
        lets the heads divide. The width is teacher_dim (`asf: equations`) or students x teacher_dim (`asf:
        code`, one or two students: the head's modalities decide, which the options do not see; a width that
        fits two students and not the one a head has is refused when the head is built, as above)."""
        d, heads = options.get("teacher_dim"), options.get("heads")
        if not (isinstance(d, int) and isinstance(heads, int) and heads > 0):
            return
        widths = [asf_width(d, n, options.get("asf", "code")) for n in (1, 2)]
        if all(w % heads for w in widths):
            raise ValueError(f"teacher_dim ({d}) is not divisible by heads ({heads}): ASF splits the teacher's width "
                             "over its attention heads (the public code: 768 with 3 or 4 heads)")

    @classmethod
    def normalization(cls, modalities, normalize: dict | None = None, teacher: str = "text",
                      students: str = "mlp", **_) -> dict[str, bool]:
        """Standardise each input (True) or not: the teacher raw (the public code; theta is read against
        ||F_T||), the student stores raw too when they are the fine-tuned students (`students: stores`, whose
        vectors were distilled against the raw teacher), the MLP students' frozen inputs standardised."""
        default = {m: m != teacher and students == "mlp" for m in modalities}
        return {**default, **{m: v == "standard" for m, v in (normalize or {}).items() if m in default}}

    def prepare(self, data) -> None:
        self.fit_teacher(data)

    def fit_teacher(self, data, epochs: int = 200, lr: float = 1e-2) -> None:
        """Fit the frozen teacher on the train split: its projection (`teacher_dim`) and, when the text store has
        no logits, its linear head; a layered text store is seen through the head's layer mix as it is now
        (before training: the layers' mean)."""
        has_logits = f"{self.teacher_name}_logits" in data.extra
        if self.teacher_proj is None and (has_logits or self.task != "categorical"):
            return
        rows = data.manifest.rows.index[data.manifest.rows["split"] == "train"].to_numpy()
        x = torch.from_numpy(data.features[self.teacher_name][rows])
        if self.teacher_name in self.mixers:
            with torch.no_grad():
                x = self.mixers[self.teacher_name](x.to(self.mixers[self.teacher_name].logits.device)).cpu()
        keep = torch.from_numpy(data.valid[self.teacher_name][rows])
        if self.task == "categorical":
            y = torch.from_numpy(data.label_ids[rows])
            keep &= y >= 0
            loss_of = F.cross_entropy
        else:   # a dimensional teacher (projection only): regression on the finite targets
            y = torch.nan_to_num(torch.from_numpy(data.dim_values[rows]))
            keep &= torch.from_numpy(data.dim_values[rows]).isfinite().all(-1)
            loss_of = F.mse_loss
        proj = nn.Linear(x.shape[1], self.teacher_proj.out_features) if self.teacher_proj is not None else nn.Identity()
        head = nn.Linear(self.teacher_head.in_features, self.n_out)
        opt = torch.optim.Adam([*proj.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
        for _ in range(epochs):
            loss = loss_of(head(proj(x[keep])), y[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if self.teacher_proj is not None:
            self.teacher_proj.load_state_dict(proj.state_dict())
        self.teacher_head.load_state_dict(head.state_dict())

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """F_T: a teacher-store vector through the frozen projection, when there is one."""
        return self.teacher_proj(x) if self.teacher_proj is not None else x

    def teacher_logits(self, batch: DialogueBatch) -> torch.Tensor:
        key = f"{self.teacher_name}_logits"
        if key in batch.extra:
            return batch.extra[key][batch.mask]
        return self.teacher_head(self.teacher_features(batch.features[self.teacher_name][batch.mask]))

    def encode(self, batch: DialogueBatch):
        """Teacher vectors F_T, student (feature, logits) and student validity of the real utterances only
        ([n, ...]): TelME is context-free, so the padding of a dialogue batch is never computed. A masked
        student's feature is zero (its MLP's biases never reach the fusion)."""
        m = batch.mask
        f_t = self.teacher_features(batch.features[self.teacher_name][m])
        valid = {s: batch.valid[s][m] for s in self.student_names}
        if self.student_mode == "stores":   # the fine-tuned students' vectors, in the teacher's (projected) space
            return f_t, {s: (self.teacher_features(batch.features[s][m]) * valid[s][..., None], None)
                         for s in self.student_names}, valid
        students = {}
        for s in self.student_names:
            f_s, z_s = self.students[s](batch.features[s][m] * valid[s][..., None])
            students[s] = (f_s * valid[s][..., None], z_s)
        return f_t, students, valid

    def forward(self, batch: DialogueBatch) -> torch.Tensor:
        batch = self.mix(batch)
        f_t, students, valid = self.encode(batch)
        vecs = [students[s][0].detach() for s in self.student_names]
        z = self.classifier(self.asf(f_t, vecs, [valid[s] for s in self.student_names])) if hasattr(self, "asf") \
            else self.classifier(torch.cat([f_t] + vecs, dim=-1))
        return batch.padded(z)

    def loss(self, batch: DialogueBatch, out: torch.Tensor):
        batch = self.mix(batch)   # the students distil from the mixed teacher features
        fusion = self.task_loss(batch, out)
        if self.student_mode == "stores":   # the students were distilled in their own fine-tune (stage 1)
            return fusion, {"fusion": float(fusion.detach())}
        # the students' own pass: `forward` gives the fusion detached copies, so L_student trains them here
        f_t, students, _ = self.encode(batch)
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
                student = student + self.beta * feature_kd_loss(f_s[ok], f_t[ok].detach(), self.tau_f, self.kd_rows)
            parts[f"student_{m}"] = float(student.detach())
            total = total + student
        return total, parts
