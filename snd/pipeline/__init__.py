"""snd.pipeline"""
