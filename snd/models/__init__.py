"""snd.models"""
