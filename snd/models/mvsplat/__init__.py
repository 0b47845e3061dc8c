"""snd.models.mvsplat"""
