# Rendered by imagefactory from templates/amazon-ebs.pkr.hcl.j2 for images/ubuntu-20.04.yaml.
# Do not edit: change the template or the image definition and run `inv render`.
# No credentials appear here: they reach Packer through its environment.

packer {
  required_version = ">= 1.6.6"
}

variable "serial" {
  type        = string
  description = "Build serial (YYYYMMDD.N); part of the artifact's name."
}

variable "manifest_path" {
  type        = string
  description = "Where Packer's manifest post-processor records the artifact."
}

variable "report_directory" {
  type        = string
  description = "Where the image's package manifest and facts are downloaded to."
}

locals {
  artifact_name = "ubuntu-20.04-${var.serial}"
}

# Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile)
# in Packer's environment.
source "amazon-ebs" "image" {
  region                 = "us-east-1"
  skip_region_validation = true
  instance_type          = "t3.micro"
  ssh_username           = "ubuntu"
  ami_name               = local.artifact_name
  ami_description        = "ubuntu-20.04 for strongSwan VPN servers (snapd purged, strongswan-starter)"
  source_ami_filter {
    filters = {
      name                = "ubuntu/images/hvm-ssd/ubuntu-focal-20.04-amd64-server-*"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["099720109477"]
    most_recent = true
  }
  tags = {
    "imagefactory:image"  = "ubuntu-20.04"
    "imagefactory:serial" = var.serial
    "imagefactory:state"  = "built"
  }
}

build {
  sources = ["source.amazon-ebs.image"]

  provisioner "shell" {
    script            = "${path.root}/scripts/00-prepare.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=ubuntu", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/10-upgrade.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=ubuntu", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/20-purge.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=ubuntu", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/30-strongswan.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=ubuntu", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/40-boot.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=ubuntu", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/80-report.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=ubuntu", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "file" {
    direction   = "download"
    source      = "/var/tmp/imagefactory-report.tar"
    destination = "${var.report_directory}/report.tar"
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/90-cleanup.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=ubuntu", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  post-processor "manifest" {
    output     = var.manifest_path
    strip_path = false
    custom_data = {
      image    = "ubuntu-20.04"
      provider = "amazon-ebs"
      serial   = var.serial
    }
  }
}
