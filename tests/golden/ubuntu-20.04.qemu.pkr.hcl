# Rendered by imagefactory from templates/qemu.pkr.hcl.j2 for images/ubuntu-20.04.yaml.
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

variable "base_image" {
  type        = string
  description = "Path of the base qcow2 (built from the Ubuntu archive or a verified cloud image)."
}

variable "base_image_checksum" {
  type        = string
  description = "sha256:<hex> of the base image."
}

variable "output_directory" {
  type = string
}

variable "seed_directory" {
  type        = string
  description = "Holds the NoCloud user-data and meta-data carrying this build's ephemeral SSH key."
}

variable "ssh_private_key_file" {
  type        = string
  description = "This build's ephemeral SSH key (deleted after the build)."
}

variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "kvm when a probe guest actually ran under KVM, otherwise tcg."
}
locals {
  artifact_name = "ubuntu-20.04-${var.serial}"
}

source "qemu" "image" {
  vm_name          = "${local.artifact_name}.qcow2"
  disk_image       = true
  iso_url          = var.base_image
  iso_checksum     = var.base_image_checksum
  use_backing_file = false
  disk_size        = "4G"
  format           = "qcow2"
  disk_interface   = "virtio"
  # fstrim in the guest frees blocks in the qcow2 itself, and zeros written become holes.
  disk_discard       = "unmap"
  disk_detect_zeroes = "unmap"
  net_device       = "virtio-net"
  accelerator      = var.accelerator
  headless         = true
  output_directory = var.output_directory
  # A compacted, compressed image is what gets published; Packer does the first pass.
  disk_compression = true
  cd_files         = ["${var.seed_directory}/meta-data", "${var.seed_directory}/user-data"]
  cd_label         = "cidata"
  qemuargs = [
    ["-m", "2048"],
    ["-smp", "2"],
    ["-serial", "file:${var.output_directory}/../console.log"],
  ]
  communicator           = "ssh"
  ssh_username           = "root"
  ssh_private_key_file   = var.ssh_private_key_file
  ssh_timeout            = "15m"
  ssh_handshake_attempts = 100
  shutdown_command       = "shutdown -P now"
  shutdown_timeout       = "5m"
}

build {
  sources = ["source.qemu.image"]

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
      provider = "qemu"
      serial   = var.serial
    }
  }
}
