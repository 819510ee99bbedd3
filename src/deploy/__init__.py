"""Deployment: export to MINDIR/ONNX/AIR (QDQ for QAT nets), onnxruntime models, ONNX evaluation, prediction."""
