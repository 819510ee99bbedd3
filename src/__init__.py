"""Image-classification training package (MobileNetV2, ResNet-50/101) on MindSpore."""
