"""Running cells: the driver of ``fewbench run`` (``runner``), the one worker path
(``worker``), the training loop (``training``), evaluation on fixed episodes
(``evaluation``), choosing the executor (``executor_setup``), ``fewbench tune``
(``tuning``), experiment trackers (``trackers``), torchrun ranks (``torchrun``), provenance
(``provenance``), what each cell cost (``cost``), interrupts, heartbeats and the CPU heap
setting."""
