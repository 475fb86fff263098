"""polyrec's model, its Ray Train + DeepSpeed training, the model artifact and evaluation.

Reads what ``data`` writes; never imports ``serve`` or ``cluster``.
"""
