"""ResNet-50/101 (He et al., 2016): the cards. The nets (ModelZoo parameter names) are in net.py."""
from src.models.registry import ModelCard, PublishedWeights, register_model

_MINDCV = "https://download.mindspore.cn/toolkits/mindcv/resnet"
_TORCHVISION = "https://download.pytorch.org/models"

register_model(ModelCard(
    name="resnet50", build="src.models.resnet.net:resnet50", family="resnet", bn_eps=1e-5, width_multiplier=False,
    drop_path=True,
    min_image_size=32, source_names={"mindcv": "resnet50", "torchvision/timm": "resnet50"},
    published=(PublishedWeights("mindcv:resnet50", f"{_MINDCV}/resnet50-e0733ab8.ckpt", digest_in_name=False),
               PublishedWeights("torchvision:resnet50", f"{_TORCHVISION}/resnet50-0676ba61.pth", digest_in_name=True)),
))
register_model(ModelCard(
    name="resnet101", build="src.models.resnet.net:resnet101", family="resnet", bn_eps=1e-5, width_multiplier=False,
    drop_path=True,
    min_image_size=32, source_names={"mindcv": "resnet101", "torchvision/timm": "resnet101"},
    published=(PublishedWeights("mindcv:resnet101", f"{_MINDCV}/resnet101-689c5e77.ckpt", digest_in_name=False),
               PublishedWeights("torchvision:resnet101", f"{_TORCHVISION}/resnet101-63fe2227.pth",
                                digest_in_name=True)),
))
