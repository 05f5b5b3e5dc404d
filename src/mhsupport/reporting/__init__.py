"""The report, by job: the paper's systems and orderings as data (paper), the rows and paired tests
made from the runs (tables), the figures (figures), and the Markdown from templates (render)."""
