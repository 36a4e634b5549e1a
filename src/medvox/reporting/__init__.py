"""Pages people read: the HTML report, the comparison of runs, the page helpers."""
