"""Built-in task-vector transforms (DARE, ...), one module each, imported on the first registry
lookup like the methods in `saft_hf.merging.methods`."""
