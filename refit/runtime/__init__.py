"""The model as served: a version's files and its own tokenizer, the ONNX graphs, the cascade and its student,
kept encoder states. It knows no registry, stage, HTTP server or Prefect."""
