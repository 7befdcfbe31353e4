# Rendered by imagefactory from templates/hcloud.pkr.hcl.j2 for images/ubuntu-20.04.yaml.
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

# The API token comes from HCLOUD_TOKEN in Packer's environment.
source "hcloud" "image" {
  image         = "ubuntu-20.04"
  location      = "fsn1"
  server_type   = "cx11"
  server_name   = "imagefactory-build-${replace(var.serial, ".", "-")}"
  ssh_username  = "root"
  snapshot_name = local.artifact_name
  snapshot_labels = {
    "imagefactory/image"  = "ubuntu-20.04"
    "imagefactory/serial" = var.serial
    "imagefactory/state"  = "built"
  }
}

build {
  sources = ["source.hcloud.image"]

  provisioner "shell" {
    script            = "${path.root}/scripts/00-prepare.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=root", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/10-upgrade.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=root", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/20-purge.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=root", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/30-strongswan.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=root", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/40-boot.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=root", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/80-report.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=root", "DEBIAN_FRONTEND=noninteractive"]
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
    environment_vars  = ["BUILD_USER=root", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  post-processor "manifest" {
    output     = var.manifest_path
    strip_path = false
    custom_data = {
      image    = "ubuntu-20.04"
      provider = "hcloud"
      serial   = var.serial
    }
  }
}
