"""lm-evaluation-harness model `kvcomp-llama`."""
