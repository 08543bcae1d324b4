"""Training: the train state (``state``), the jitted DAP step (``step``), preference pairs (``pairs``), the online
loop of annotation phases (``loop``) and checkpoints (``checkpoint``)."""
