"""densediff's Hydra configs. Installed as the package `densediff.conf` (pyproject.toml maps it to this folder), so an
installed densediff finds them as package data (densediff.run.config_dir); Hydra reads only the .yaml files."""
