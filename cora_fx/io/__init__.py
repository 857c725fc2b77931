"""What leaves the process: the summary of a converted model, `.pt2` save and load, and the ONNX export."""
