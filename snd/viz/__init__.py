"""snd.viz: the pictures researchers look at first — PCA colours, K-means segments, cross-view matches."""
from snd.viz.kmeans import kmeans
from snd.viz.matches import draw_matches, mutual_nn
from snd.viz.pca import pca_colors

__all__ = ["draw_matches", "kmeans", "mutual_nn", "pca_colors"]
