"""Training: the train state (``state``), the jitted DAP step (``step``), the LoRA ensemble (``lora``), preference
pairs (``pairs``), the online loop of annotation phases (``loop``) and checkpoints (``checkpoint``)."""
