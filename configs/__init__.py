"""Config files: each defines get_config(); load them with tlt_jax.config.load_config."""
