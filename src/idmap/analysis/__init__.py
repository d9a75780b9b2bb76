"""Reading runs and setting them beside the paper: the paper's numbers (paper.py), runs as built
(run_records.py), the paper tables (report.py) and sweep tables (sweep_table.py) made of one kind
of line (lines.py) with their statistics (stats.py), curves, signal propagation, loss landscapes
and the results page (results_page.py). Nothing here writes into a run."""
