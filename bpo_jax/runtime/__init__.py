"""Where a run executes: process start-up (``cluster``), processes and the host-aware mesh (``distributed``),
logical-axis sharding (``sharding``), run directories (``run_dir``) and metric trackers (``trackers``)."""
