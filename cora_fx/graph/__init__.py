"""The torch.fx side: capture (symbolic tracing or torch.export), the passes that lift functional layers and
rewrite convs into quantized conv + adapter, the weight-coverage audit, and the lowering to packed codes and ops."""
