"""Command-line tools that prepare data (DMP's data pipeline: densediff.tools.dmp_data)."""
