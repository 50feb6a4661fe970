"""Long-context evaluations: needle-in-a-haystack and RULER-style tasks, BABILong-style QA, MQAR,
genomics and perplexity against the context read, reports (JSON, Markdown, heatmaps) and an adapter
for EleutherAI's lm-eval. Run them with ``titans-lnn eval TASK`` or from Python:

    from titans_lnn.evals.runner import load_model, evaluate_task
    from titans_lnn.evals.report import write_report

Importing this package imports nothing heavy; each module loads what it needs.
"""
