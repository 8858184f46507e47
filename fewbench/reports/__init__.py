"""Reading results: loading run directories (``results``), tables (``table``) and their
formats (``formats``), ranks, HTML, ``compare`` and its statistics, plots, ``status`` and the
published numbers (``references``)."""
