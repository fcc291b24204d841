"""Config files: each defines get_config(); load them with tlt_jax.app.config.load_config."""
