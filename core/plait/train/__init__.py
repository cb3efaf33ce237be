"""Training: the loop (:mod:`.loop`), checkpoints (:mod:`.checkpoint`), process-group and
seed setup (:mod:`.distributed`), the progress bar (:mod:`.progress`) and
loading what a run saved (:mod:`.trained`)."""
