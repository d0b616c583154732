"""An example third-party benchbase plugin."""
