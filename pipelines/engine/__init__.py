"""The stage model and the engine: stage definitions, planning, execution, workers."""
