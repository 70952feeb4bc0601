"""Make a trained detector deployable: prune, quantize (int8), distill, export to ONNX.

``compress`` runs the steps and measures each; ``onnx_export`` writes an ONNX file checked
against PyTorch; serving lives in ``deepfake_dist.serve``.
"""
