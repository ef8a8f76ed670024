"""Run orchestration on Ray Data, resume, CLI, DuckDB stats and exports."""
