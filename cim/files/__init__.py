"""The file service's domain: content-addressed blobs, chunked uploads, thumbnails.

Images, voice and files travel beside the IM connection (design: 图片、语音等大文件先
发送到HTTP服务器): a client uploads the bytes here and sends a message carrying a
signed URL. Only ``cim.files.http`` speaks HTTP; ``cim.services.files`` runs it.
"""
