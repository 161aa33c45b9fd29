// One TCP connection to the runtime, after the ZMTP handshake. Used only by Transport's background threads:
// the reader polls and receives, the writer sends; a lock keeps the reader's PONGs and the writer's messages
// from interleaving mid-frame.
using System;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace Gllm
{
    internal sealed class ZmtpSocket
    {
        readonly Socket socket;
        readonly ZmtpReader reader;
        readonly object writeLock = new object();
        readonly byte[] chunk = new byte[64 * 1024];

        ZmtpSocket(Socket socket, long maxFrameBytes)
        {
            this.socket = socket;
            reader = new ZmtpReader(maxFrameBytes);
        }

        /// <summary>Connect and handshake, each within its timeout; throws on failure.</summary>
        public static ZmtpSocket Open(IPEndPoint endpoint, TimeSpan connectTimeout, TimeSpan handshakeTimeout, long maxFrameBytes)
        {
            var socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                socket.NoDelay = true;  // tokens are small messages: send each at once
                IAsyncResult pending = socket.BeginConnect(endpoint, null, null);
                if (!pending.AsyncWaitHandle.WaitOne(connectTimeout))
                    throw new TimeoutException("no TCP connection to " + endpoint + " within " + connectTimeout.TotalSeconds + " s");
                socket.EndConnect(pending);
                // A write blocked this long means the runtime stopped reading: give up on the connection.
                socket.SendTimeout = (int)handshakeTimeout.TotalMilliseconds;
                var conn = new ZmtpSocket(socket, maxFrameBytes);
                conn.Handshake(Stopwatch.StartNew(), handshakeTimeout);
                return conn;
            }
            catch
            {
                socket.Close();
                throw;
            }
        }

        void Handshake(Stopwatch clock, TimeSpan timeout)
        {
            Send(Zmtp.Greeting());
            byte[] greeting;
            while ((greeting = reader.TakeRaw(Zmtp.GreetingSize)) == null) ReceiveBefore(clock, timeout);
            Zmtp.CheckGreeting(greeting);
            Send(Zmtp.CommandFrame("READY", Zmtp.ReadyData("DEALER")));
            ZmtpFrame frame;
            while (!reader.TryTakeFrame(out frame)) ReceiveBefore(clock, timeout);
            if (!frame.IsCommand) throw new ZmtpException("the peer sent a message before its READY command");
            byte[] data;
            string name = Zmtp.CommandName(frame.Body, out data);
            if (name == "ERROR")
                throw new ZmtpException("the runtime refused the connection: " + ErrorReason(data));
            if (name != "READY") throw new ZmtpException("expected READY from the runtime, got " + name);
            byte[] type;
            Zmtp.ParseMetadata(data).TryGetValue("socket-type", out type);
            string peerType = type == null ? "(none)" : Encoding.ASCII.GetString(type);
            if (peerType != "ROUTER" && peerType != "DEALER")
                throw new ZmtpException("the peer is a " + peerType + " socket; a DEALER talks to a ROUTER or DEALER");
        }

        /// <summary>The reason text of an ERROR command: a 1-byte length, then the text.</summary>
        public static string ErrorReason(byte[] data)
        {
            if (data.Length == 0) return "(no reason given)";
            int n = Math.Min(data[0], data.Length - 1);
            return Encoding.ASCII.GetString(data, 1, n);
        }

        void ReceiveBefore(Stopwatch clock, TimeSpan timeout)
        {
            TimeSpan left = timeout - clock.Elapsed;
            if (left <= TimeSpan.Zero || !socket.Poll((int)left.TotalMilliseconds * 1000, SelectMode.SelectRead))
                throw new TimeoutException("the ZMTP handshake did not finish within " + timeout.TotalSeconds + " s");
            Receive();
        }

        /// <summary>True when bytes (or the end of the stream) are waiting; throws once the socket is closed.</summary>
        public bool WaitReadable(int milliseconds)
        {
            return socket.Poll(milliseconds * 1000, SelectMode.SelectRead);
        }

        /// <summary>Reads what has arrived into the frame reader; throws when the runtime closed the connection.</summary>
        public void Receive()
        {
            int n = socket.Receive(chunk);
            if (n == 0) throw new ZmtpException("the runtime closed the connection");
            reader.Feed(chunk, 0, n);
        }

        public bool TryTakeFrame(out ZmtpFrame frame)
        {
            return reader.TryTakeFrame(out frame);
        }

        /// <summary>Writes whole frames; safe from several threads.</summary>
        public void Send(byte[] bytes)
        {
            lock (writeLock)
            {
                int sent = 0;
                while (sent < bytes.Length) sent += socket.Send(bytes, sent, bytes.Length - sent, SocketFlags.None);
            }
        }

        /// <summary>Closes at once; the reader's next Poll (at most one tick later) throws. Never throws.</summary>
        public void Close()
        {
            try { socket.Close(); }
            catch (Exception) { }
        }
    }
}
