"""Model specs -> nn.Module: torchvision:/sample:/pkg.module:factory specs, user weights, the shipped samples, what code a spec may run."""
