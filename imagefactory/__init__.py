"""Certified-image factory for strongSwan VPN servers.

Images are described as data (``images/*.yaml``), rendered into Packer templates
(``templates/``), built, booted and checked (``checks/``), and published only when
the checks pass for that exact artifact.
"""

__version__ = "0.1.0"
