"""One thin CLI per DVC stage: read params, call pipeline/ and heads/, write outputs."""
