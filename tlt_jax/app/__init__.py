"""The application layer: the config schema (``app.config``), the typed specs built from a config
(``app.specs``), the factories that load what a config names (``app.build``), the training job
(``app.trainer``), held-out evaluation (``app.evaluator``), and config-driven tools (ahead-of-time compilation,
weight-free inspection)."""
