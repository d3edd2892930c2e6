"""Run by the WebUI (as a subprocess, `import launch` works) before it starts: installs only what the WebUI lacks.

The core needs torch, safetensors, Pillow and numpy, which the WebUI pins and always has; we never install,
upgrade or downgrade a package the WebUI pins. So in a normal WebUI this installs nothing and says so.
"""

import launch

# (distribution name, import name): pinned by the WebUI, so only checked and never installed by us.
WEBUI_PROVIDES = [("torch", "torch"), ("safetensors", "safetensors"), ("Pillow", "PIL"), ("numpy", "numpy")]
# Packages the extension needs that the WebUI does not pin: pip spec per distribution name (none today).
EXTRA = {}


def main():
    for dist, module in WEBUI_PROVIDES:
        found = launch.is_installed(dist) or launch.is_installed(module)
        status = "present" if found else "MISSING (the WebUI should provide it; not installed by this extension)"
        print(f"[Fine-tune] {dist}: {status}")
    for dist, spec in EXTRA.items():
        if launch.is_installed(dist):
            print(f"[Fine-tune] {dist}: present")
        else:
            launch.run_pip(f"install {spec}", f"{dist} for the Fine-tune extension")
            print(f"[Fine-tune] {dist}: installed ({spec})")
    if not EXTRA:
        print("[Fine-tune] nothing to install")


main()
