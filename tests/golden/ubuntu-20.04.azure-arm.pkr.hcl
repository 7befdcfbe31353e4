# Rendered by imagefactory from templates/azure-arm.pkr.hcl.j2 for images/ubuntu-20.04.yaml.
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

# Service principal credentials: read from the environment at run time, never rendered.
variable "client_id" {
  type      = string
  default   = env("ARM_CLIENT_ID")
  sensitive = true
}

variable "client_secret" {
  type      = string
  default   = env("ARM_CLIENT_SECRET")
  sensitive = true
}

variable "subscription_id" {
  type      = string
  default   = env("ARM_SUBSCRIPTION_ID")
  sensitive = true
}

variable "tenant_id" {
  type      = string
  default   = env("ARM_TENANT_ID")
  sensitive = true
}
locals {
  artifact_name = "ubuntu-20.04-${var.serial}"
}

source "azure-arm" "image" {
  client_id                         = var.client_id
  client_secret                     = var.client_secret
  subscription_id                   = var.subscription_id
  tenant_id                         = var.tenant_id
  os_type                           = "Linux"
  image_publisher                   = "Canonical"
  image_offer                       = "0001-com-ubuntu-server-focal"
  image_sku                         = "20_04-lts"
  location                          = "eastus"
  vm_size                           = "Standard_B1s"
  ssh_username                      = "packer"
  managed_image_name                = local.artifact_name
  managed_image_resource_group_name = "algo-images"
  azure_tags = {
    "imagefactory-image"  = "ubuntu-20.04"
    "imagefactory-serial" = var.serial
    "imagefactory-state"  = "built"
  }
}

build {
  sources = ["source.azure-arm.image"]

  provisioner "shell" {
    script            = "${path.root}/scripts/00-prepare.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=packer", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/10-upgrade.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=packer", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/20-purge.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=packer", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/30-strongswan.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=packer", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/40-boot.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=packer", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  provisioner "shell" {
    script            = "${path.root}/scripts/80-report.sh"
    execute_command   = "chmod +x {{ .Path }}; sudo -E -S env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=packer", "DEBIAN_FRONTEND=noninteractive"]
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
    environment_vars  = ["BUILD_USER=packer", "DEBIAN_FRONTEND=noninteractive"]
    expect_disconnect = false
  }

  post-processor "manifest" {
    output     = var.manifest_path
    strip_path = false
    custom_data = {
      image    = "ubuntu-20.04"
      provider = "azure-arm"
      serial   = var.serial
    }
  }
}
