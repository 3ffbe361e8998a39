"""Packaging and deployment (the seed's ``AccelContainerImage``, ``Image``,
``Webservice``, SEED_API §2.3-2.4, §8 steps 10-12 and 16), locally.

- ``AccelContainerImage.image_configuration(...)`` + ``Image.create(registry, name,
  [converted_model], config)``: a self-contained bundle (BFP plan, server config,
  Dockerfile, pinned requirements).
- ``Webservice.deploy_from_image(registry, name, image, config, target)``:
  ``LocalTarget()`` runs ``python -m bfpaccel.serve`` on 127.0.0.1 (``LocalWebservice.
  deploy_configuration``); ``KubernetesTarget(output_dir)`` writes manifests
  (``AksWebservice.deploy_configuration``).

No TensorFlow is imported (``AccelInferenceConfig`` converts, and so needs it, only when
asked to convert).
"""

from .image import AccelContainerImage, AccelImageConfiguration, AccelInferenceConfig, Image, ImageError
from .k8s import render_manifests
from .webservice import (
    AksWebservice,
    DeploymentError,
    KubernetesDeploymentConfiguration,
    KubernetesTarget,
    LocalDeploymentConfiguration,
    LocalTarget,
    LocalWebservice,
    Webservice,
    check_health,
    generate_self_signed_cert,
)

__all__ = [
    "AccelContainerImage",
    "AccelImageConfiguration",
    "AccelInferenceConfig",
    "Image",
    "ImageError",
    "Webservice",
    "LocalWebservice",
    "AksWebservice",
    "LocalTarget",
    "KubernetesTarget",
    "LocalDeploymentConfiguration",
    "KubernetesDeploymentConfiguration",
    "DeploymentError",
    "check_health",
    "generate_self_signed_cert",
    "render_manifests",
]
