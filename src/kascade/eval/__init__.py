"""The offline accuracy suite behind `kascade eval`.

* :mod:`.tasks`: RULER-style task generators (fixed seeds, token lengths measured with the model's tokenizer).
* :mod:`.scoring`: RULER's string-match scoring.
* :mod:`.runner`: methods x tasks x lengths x samples x budgets, resumable (JSON-lines cell cache).
* :mod:`.decode_heavy`: teacher-forced long continuations (perplexity, KL to dense, top-1 agreement).
* :mod:`.report`: table, JSON, plots (the Pareto chart: suite score vs attended keys and vs modelled speedup).
* :mod:`.speed_model`: each method's attended-key fraction and modelled decode speedup (from the committed
  `kascade bench decode` ratios).
"""
