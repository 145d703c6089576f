"""Datasets (SYSU-MM01, RegDB, synthetic), transforms and samplers for visible-infrared re-ID."""
