"""MobileNetV3 Large and Small (Howard et al., 2019): the cards. The nets (mindcv parameter names) are in net.py."""
from src.models.registry import ModelCard, PublishedWeights, register_model


def _card(size: str, mindcv_file: str, torchvision_file: str) -> ModelCard:
    return ModelCard(
        name=f"mobilenetv3_{size}", build=f"src.models.mobilenetv3.net:mobilenetv3_{size}", family="mobilenetv3",
        dropout=0.2, bn_eps=1e-3, drop_path=True,
        source_names={"mindcv": f"mobilenet_v3_{size}_{{w}}", "torchvision/timm": f"mobilenet_v3_{size}"},
        published=(
            PublishedWeights(f"mindcv:mobilenet_v3_{size}_100", "https://download.mindspore.cn/toolkits/mindcv/"
                             f"mobilenet/mobilenetv3/{mindcv_file}", digest_in_name=False),
            PublishedWeights(f"torchvision:mobilenet_v3_{size}", f"https://download.pytorch.org/models/{torchvision_file}",
                             digest_in_name=True)))


register_model(_card("large", "mobilenet_v3_large_100-1279ad5f.ckpt", "mobilenet_v3_large-8738ca79.pth"))
register_model(_card("small", "mobilenet_v3_small_100-509c6047.ckpt", "mobilenet_v3_small-047dcff4.pth"))
