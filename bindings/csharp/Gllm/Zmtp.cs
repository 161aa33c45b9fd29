// ZMTP 3.1 (rfc.zeromq.org/spec/37) as a DEALER peer: just enough ZeroMQ to talk to the runtime's ROUTER
// socket over a plain TCP socket, without libzmq.
//
// A connection: both peers send a 64-byte greeting (we send ours whole, at once), then the NULL mechanism's
// READY command carrying our Socket-Type (DEALER) and an empty Identity, and read the runtime's READY. After
// that the stream is a sequence of frames: a flags byte (bit 0 MORE, bit 1 LONG size, bit 2 COMMAND),
// a size (1 byte, or 8 bytes big-endian when LONG), and the body. Commands carry a name and data; the
// runtime sends PING heartbeats, which must be answered with PONG or it drops the connection.
//
// Only the NULL mechanism exists here: no CurveZMQ encryption, no authentication. That is why the clients
// talk only to a runtime on the same machine (see LlmClientOptions.AllowNonLoopback).
using System;
using System.Collections.Generic;
using System.Text;

namespace Gllm
{
    /// <summary>The peer broke ZMTP, refused us, or is not a compatible ZeroMQ socket.</summary>
    public sealed class ZmtpException : Exception
    {
        public ZmtpException(string message) : base(message) { }
    }

    /// <summary>One frame off the wire: a part of a message, or a command.</summary>
    public struct ZmtpFrame
    {
        public bool IsCommand;
        public bool More;
        public byte[] Body;
    }

    public static class Zmtp
    {
        public const int GreetingSize = 64;
        public const byte FlagMore = 0x01, FlagLong = 0x02, FlagCommand = 0x04;
        const int MechanismOffset = 12, MechanismSize = 20;

        /// <summary>Our greeting: signature, version 3.1, mechanism NULL, as-server 0, zero filler.</summary>
        public static byte[] Greeting()
        {
            var g = new byte[GreetingSize];
            g[0] = 0xff;  // signature: 0xff, 8 bytes of padding, 0x7f
            g[9] = 0x7f;
            g[10] = 3;  // version major
            g[11] = 1;  // version minor
            Encoding.ASCII.GetBytes("NULL", 0, 4, g, MechanismOffset);
            return g;
        }

        /// <summary>Throws unless <paramref name="g"/> is a ZMTP 3.x greeting with the NULL mechanism.</summary>
        public static void CheckGreeting(byte[] g)
        {
            if (g.Length != GreetingSize || g[0] != 0xff || g[9] != 0x7f)
                throw new ZmtpException("the peer is not a ZeroMQ socket (bad greeting signature)");
            if (g[10] < 3)
                throw new ZmtpException(string.Format("the peer speaks ZMTP {0}.x; version 3.0 or later is needed", g[10]));
            int n = 0;
            while (n < MechanismSize && g[MechanismOffset + n] != 0) n++;
            string mechanism = Encoding.ASCII.GetString(g, MechanismOffset, n);
            if (mechanism != "NULL")
                throw new ZmtpException("the runtime uses the " + mechanism + " security mechanism; these bindings speak only NULL (no CurveZMQ)");
        }

        /// <summary>Flags, size and body of one message frame, ready to write.</summary>
        public static byte[] MessageFrame(byte[] body, bool more = false)
        {
            return Frame(more ? FlagMore : (byte)0, body);
        }

        /// <summary>A command frame: name length, name, data.</summary>
        public static byte[] CommandFrame(string name, byte[] data)
        {
            byte[] nameBytes = Encoding.ASCII.GetBytes(name);
            var body = new ByteWriter(1 + nameBytes.Length + data.Length);
            body.Byte((byte)nameBytes.Length);
            body.Bytes(nameBytes);
            body.Bytes(data);
            return Frame(FlagCommand, body.ToArray());
        }

        static byte[] Frame(byte flags, byte[] body)
        {
            bool isLong = body.Length > 255;
            var w = new ByteWriter(body.Length + 9);
            w.Byte((byte)(flags | (isLong ? FlagLong : 0)));
            w.BigEndian(body.Length, isLong ? 8 : 1);
            w.Bytes(body);
            return w.ToArray();
        }

        /// <summary>READY's metadata: each property a 1-byte name length, name, 4-byte value length, value.</summary>
        public static byte[] ReadyData(string socketType)
        {
            var w = new ByteWriter(32);
            Property(w, "Socket-Type", Encoding.ASCII.GetBytes(socketType));
            Property(w, "Identity", new byte[0]);  // empty: the ROUTER picks a routing id for us
            return w.ToArray();
        }

        static void Property(ByteWriter w, string name, byte[] value)
        {
            w.Byte((byte)name.Length);
            w.Bytes(Encoding.ASCII.GetBytes(name));
            w.BigEndian(value.Length, 4);
            w.Bytes(value);
        }

        /// <summary>Splits a command body into name and data; throws if the name does not fit.</summary>
        public static string CommandName(byte[] body, out byte[] data)
        {
            if (body.Length < 1 || body[0] == 0 || body[0] > body.Length - 1)
                throw new ZmtpException("malformed command frame (bad name length)");
            int n = body[0];
            for (int i = 1; i <= n; i++)
            {
                byte c = body[i];
                if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')))
                    throw new ZmtpException("malformed command frame (the name is not letters)");
            }
            data = new byte[body.Length - 1 - n];
            Buffer.BlockCopy(body, 1 + n, data, 0, data.Length);
            return Encoding.ASCII.GetString(body, 1, n);
        }

        /// <summary>READY's properties by lower-case name (names are case-insensitive).</summary>
        public static Dictionary<string, byte[]> ParseMetadata(byte[] data)
        {
            var props = new Dictionary<string, byte[]>();
            int pos = 0;
            while (pos < data.Length)
            {
                int nameLen = data[pos++];
                if (nameLen == 0 || nameLen > data.Length - pos - 4)
                    throw new ZmtpException("malformed READY metadata (bad property name)");
                string name = Encoding.ASCII.GetString(data, pos, nameLen).ToLowerInvariant();
                pos += nameLen;
                long valueLen = ((long)data[pos] << 24) | ((long)data[pos + 1] << 16) | ((long)data[pos + 2] << 8) | data[pos + 3];
                pos += 4;
                if (valueLen > data.Length - pos)
                    throw new ZmtpException("malformed READY metadata (a value runs past the command)");
                var value = new byte[valueLen];
                Buffer.BlockCopy(data, pos, value, 0, (int)valueLen);
                pos += (int)valueLen;
                props[name] = value;
            }
            return props;
        }

        /// <summary>PING data: a 2-byte TTL in tenths of a second, then up to 16 bytes of context.</summary>
        public static byte[] PingData(TimeSpan ttl)
        {
            int tenths = (int)Math.Min(0xffff, Math.Max(0, ttl.TotalMilliseconds / 100));
            return new byte[] { (byte)(tenths >> 8), (byte)tenths };
        }

        /// <summary>The context a PONG must echo: everything after the TTL (at most 16 bytes).</summary>
        public static byte[] PongData(byte[] pingData)
        {
            if (pingData.Length < 2 || pingData.Length > 18) throw new ZmtpException("malformed PING command");
            var context = new byte[pingData.Length - 2];
            Buffer.BlockCopy(pingData, 2, context, 0, context.Length);
            return context;
        }
    }

    /// <summary>
    /// Cuts a TCP byte stream into the greeting and frames. Bytes are fed as they arrive, in any pieces;
    /// nothing blocks, and a frame whose declared size is over the limit is refused before it is buffered.
    /// </summary>
    public sealed class ZmtpReader
    {
        readonly long maxFrameBytes;
        byte[] buf = new byte[4096];
        int start, end;  // unread bytes are buf[start..end)

        public ZmtpReader(long maxFrameBytes) { this.maxFrameBytes = maxFrameBytes; }

        public int Buffered { get { return end - start; } }

        public void Feed(byte[] data, int offset, int count)
        {
            if (end + count > buf.Length)
            {
                int unread = end - start;
                byte[] target = unread + count > buf.Length ? new byte[Math.Max(buf.Length * 2, unread + count)] : buf;
                Buffer.BlockCopy(buf, start, target, 0, unread);
                buf = target;
                start = 0;
                end = unread;
            }
            Buffer.BlockCopy(data, offset, buf, end, count);
            end += count;
        }

        /// <summary>The next n raw bytes (the greeting), or null until that many have arrived.</summary>
        public byte[] TakeRaw(int n)
        {
            if (end - start < n) return null;
            var raw = new byte[n];
            Buffer.BlockCopy(buf, start, raw, 0, n);
            start += n;
            return raw;
        }

        /// <summary>The next whole frame, if one has arrived. Throws ZmtpException on a malformed header.</summary>
        public bool TryTakeFrame(out ZmtpFrame frame)
        {
            frame = default(ZmtpFrame);
            int avail = end - start;
            if (avail < 2) return false;
            byte flags = buf[start];
            if ((flags & 0xf8) != 0) throw new ZmtpException(string.Format("malformed frame (reserved flag bits set: 0x{0:x2})", flags));
            bool isCommand = (flags & Zmtp.FlagCommand) != 0, more = (flags & Zmtp.FlagMore) != 0;
            if (isCommand && more) throw new ZmtpException("malformed frame (a command with the MORE flag)");
            int headerSize = (flags & Zmtp.FlagLong) != 0 ? 9 : 2;
            if (avail < headerSize) return false;
            ulong size = 0;
            for (int i = 1; i < headerSize; i++) size = (size << 8) | buf[start + i];
            if (size > (ulong)maxFrameBytes)
                throw new ZmtpException(string.Format("a frame of {0} bytes is over the limit of {1}", size, maxFrameBytes));
            if ((ulong)(avail - headerSize) < size) return false;
            var body = new byte[size];
            Buffer.BlockCopy(buf, start + headerSize, body, 0, (int)size);
            start += headerSize + (int)size;
            if (start == end) start = end = 0;
            frame = new ZmtpFrame { IsCommand = isCommand, More = more, Body = body };
            return true;
        }
    }
}
