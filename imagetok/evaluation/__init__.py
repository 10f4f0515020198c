"""Metrics: PSNR, codebook statistics (FID, SSIM, LPIPS come with the evaluation issue)."""
