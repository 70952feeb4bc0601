"""Put a trained detector to use: score files, compress it, export it.

``scorer`` is the exported detector ready to score images (the one ``predict``, ``explain`` and
the HTTP server in ``deepfake_dist.serve`` use); ``predict`` scores and explains files and
videos; ``compress`` prunes, fine-tunes and quantizes (int8, ``quantize``) measuring each step;
``onnx_export`` writes an ONNX file checked against PyTorch.
"""
