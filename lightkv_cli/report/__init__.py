"""Report: console tables, Markdown, self-contained HTML and plots of a results dictionary.

Reads results only; never measures, never loads a model; imports no torch.
"""
