"""MobileNetV2 (Sandler et al., 2018): the card. The net (ModelZoo parameter names) is in net.py."""
from src.models.registry import ModelCard, PublishedWeights, register_model

register_model(ModelCard(
    name="mobilenetv2", build="src.models.mobilenetv2.net:mobilenetv2", bn_eps=1e-5, drop_path=True,
    source_names={"mindcv": "mobilenet_v2_{w}", "torchvision/timm": "mobilenet_v2"},
    published=(
        # mindcv 0.3.0's default_cfgs (its file names carry no documented digest)
        PublishedWeights("mindcv:mobilenet_v2_100", "https://download.mindspore.cn/toolkits/mindcv/mobilenet/"
                         "mobilenetv2/mobilenet_v2_100-d5532038.ckpt", digest_in_name=False),
        # torchvision's IMAGENET1K_V1 weights (resize 256, crop 224, bilinear), whose names start their sha256
        PublishedWeights("torchvision:mobilenet_v2", "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
                         digest_in_name=True),
    ),
))
