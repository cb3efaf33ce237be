"""Training: the loop (:mod:`.loop`), checkpoints (:mod:`.checkpoint`), the
forward pass that yields hidden states (:mod:`.forward`), process-group and
seed setup (:mod:`.distributed`), the progress bar (:mod:`.progress`) and
loading what a run saved (:mod:`.trained`)."""
