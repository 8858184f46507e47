"""Where results live: the run directory's SQLite store (``store``), a cluster task's cell
folder (``journal``), the interface a running cell reports through (``sink``), crash-safe
file writes (``atomic``), crash-test fault points (``faults``) and default folders
(``paths``)."""
