"""MobileNetV3 Large and Small (Howard et al., 2019): the cards. The nets (mindcv parameter names) are in net.py."""
from src.models.registry import ModelCard, PublishedWeights, register_model

_MINDCV = "https://download.mindspore.cn/toolkits/mindcv/mobilenet/mobilenetv3"
_TORCHVISION = "https://download.pytorch.org/models"

register_model(ModelCard(
    name="mobilenetv3_large", build="src.models.mobilenetv3.net:mobilenetv3_large", family="mobilenetv3",
    dropout=0.2, bn_eps=1e-3,
    source_names={"mindcv": "mobilenet_v3_large_{w}", "torchvision/timm": "mobilenet_v3_large"},
    published=(PublishedWeights("mindcv:mobilenet_v3_large_100", f"{_MINDCV}/mobilenet_v3_large_100-1279ad5f.ckpt",
                                digest_in_name=False),
               PublishedWeights("torchvision:mobilenet_v3_large", f"{_TORCHVISION}/mobilenet_v3_large-8738ca79.pth",
                                digest_in_name=True)),
))
register_model(ModelCard(
    name="mobilenetv3_small", build="src.models.mobilenetv3.net:mobilenetv3_small", family="mobilenetv3",
    dropout=0.2, bn_eps=1e-3,
    source_names={"mindcv": "mobilenet_v3_small_{w}", "torchvision/timm": "mobilenet_v3_small"},
    published=(PublishedWeights("mindcv:mobilenet_v3_small_100", f"{_MINDCV}/mobilenet_v3_small_100-509c6047.ckpt",
                                digest_in_name=False),
               PublishedWeights("torchvision:mobilenet_v3_small", f"{_TORCHVISION}/mobilenet_v3_small-047dcff4.pth",
                                digest_in_name=True)),
))
